#!/usr/bin/env bash
# Install what fd_jax's Lean verifier needs: elan, a pinned Lean 4 toolchain, a Mathlib project (with its
# prebuilt cache) and the Lean REPL built for the same toolchain. Prints the `repl_command` and `cwd` to
# put in the config (`lean.repl_command`, `lean.cwd`). Needs git, curl and internet access; re-running it
# is safe (finished steps are skipped).
#
#   scripts/setup_lean.sh [PREFIX]          default PREFIX: ${FD_JAX_LEAN_DIR:-$HOME/.cache/fd_jax/lean}
#
# Pinned default, and why. miniF2F as used by every published number since DeepSeek-Prover-V1.5
# (../shared/data/minif2f.jsonl) was written against Lean 4.9.0 and the Mathlib of that time, and
# DeepSeek-Prover-V1.5/V2 and Goedel-Prover report their miniF2F results with Lean 4.9.0. Later Mathlib
# renamed lemmas, changed definitions and deprecated notation the statements use (`∑ x in s` became
# `∑ x ∈ s`), so with a recent Mathlib some statements elaborate differently or need edits and results stop
# being comparable. So the default is Lean v4.9.0, the REPL at its tag v4.9.0, and Mathlib at f0957a7575,
# the commit the REPL's own v4.9.0 Mathlib test project pins (test/Mathlib/lake-manifest.json at that tag):
# a combination the REPL's authors ran together. Messages then use Lean 4.9's spelling (`unknown identifier
# 'x'`); fd_jax normalises them. For numbers comparable with a Kimina Lean Server's default setup use
#   LEAN_VERSION=v4.15.0 MATHLIB_REV=v4.15.0 scripts/setup_lean.sh
# (any Lean version with a matching REPL tag works: the REPL must be built with the toolchain Mathlib uses,
# or it cannot read Mathlib's .olean files).
set -euo pipefail

LEAN_VERSION="${LEAN_VERSION:-v4.9.0}"
MATHLIB_REV="${MATHLIB_REV:-f0957a7575317490107578ebaee9efaf8e62a4ab}"
REPL_REV="${REPL_REV:-$LEAN_VERSION}"
PREFIX="${1:-${FD_JAX_LEAN_DIR:-$HOME/.cache/fd_jax/lean}}"
TOOLCHAIN="leanprover/lean4:${LEAN_VERSION}"
REPL_DIR="$PREFIX/repl"
PROJECT_DIR="$PREFIX/mathlib_project"
REPL_BIN="$REPL_DIR/.lake/build/bin/repl"

say() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'setup_lean.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in git curl; do
  command -v "$tool" >/dev/null || die "'$tool' is required (install it with your package manager)"
done
mkdir -p "$PREFIX"

# 1. elan (the Lean version manager), without touching shell profiles.
export ELAN_HOME="${ELAN_HOME:-$HOME/.elan}"
export PATH="$ELAN_HOME/bin:$PATH"
if ! command -v elan >/dev/null; then
  say "installing elan into $ELAN_HOME"
  curl -sSfL https://raw.githubusercontent.com/leanprover/elan/master/elan-init.sh \
    | sh -s -- -y --default-toolchain none --no-modify-path
fi
say "installing the Lean toolchain $TOOLCHAIN"
elan toolchain install "$TOOLCHAIN"

# 2. The REPL, built with that toolchain.
if [ ! -d "$REPL_DIR/.git" ]; then
  say "cloning leanprover-community/repl"
  git clone --quiet https://github.com/leanprover-community/repl.git "$REPL_DIR"
fi
git -C "$REPL_DIR" fetch --quiet --tags origin
git -C "$REPL_DIR" checkout --quiet "$REPL_REV"
repl_toolchain="$(tr -d '[:space:]' < "$REPL_DIR/lean-toolchain")"
[ "$repl_toolchain" = "$TOOLCHAIN" ] \
  || die "the REPL at $REPL_REV uses $repl_toolchain, not $TOOLCHAIN; set REPL_REV to the REPL tag for $LEAN_VERSION"
say "building the REPL ($REPL_REV)"
(cd "$REPL_DIR" && lake build)
[ -x "$REPL_BIN" ] || die "the REPL build did not produce $REPL_BIN"

# 3. A Mathlib project at the pinned revision, with Mathlib's prebuilt .olean cache.
mkdir -p "$PROJECT_DIR"
echo "$TOOLCHAIN" > "$PROJECT_DIR/lean-toolchain"
cat > "$PROJECT_DIR/lakefile.lean" <<EOF
import Lake
open Lake DSL

package fd_jax_lean

require mathlib from git "https://github.com/leanprover-community/mathlib4" @ "$MATHLIB_REV"
EOF
cd "$PROJECT_DIR"
if [ ! -d .lake/packages/mathlib ] || ! grep -Eq "\"(rev|inputRev)\": \"$MATHLIB_REV\"" lake-manifest.json 2>/dev/null; then
  say "fetching Mathlib $MATHLIB_REV and its dependencies"
  lake update
fi
mathlib_toolchain="$(tr -d '[:space:]' < .lake/packages/mathlib/lean-toolchain)"
[ "$mathlib_toolchain" = "$TOOLCHAIN" ] \
  || die "Mathlib $MATHLIB_REV wants $mathlib_toolchain, not $TOOLCHAIN; pick a matching MATHLIB_REV"
say "downloading Mathlib's prebuilt cache"
if ! lake exe cache get; then
  # Old Mathlib revisions may point at a cache host that has moved; building takes hours instead.
  say "warning: 'lake exe cache get' failed; building Mathlib from source (hours, several GB of RAM per job)"
  lake build Mathlib
fi

# 4. Check the whole chain on a real proof (importing Mathlib takes a while the first time).
if [ "${SKIP_CHECK:-0}" != "1" ]; then
  say "checking: lake env repl on a Mathlib proof"
  check='{"cmd": "import Mathlib\ntheorem fd_jax_setup_check : (2 : ℕ) + 2 = 4 := by norm_num"}'
  answer="$(printf '%s\n\n' "$check" | lake env "$REPL_BIN")" || die "the REPL failed: $answer"
  case "$answer" in
    *'"env"'*) ;;
    *) die "unexpected REPL answer: $answer" ;;
  esac
  case "$answer" in
    *'"severity": "error"'*) die "Lean reported an error on the check proof: $answer" ;;
  esac
fi

lake_bin="$(command -v lake)"
cat <<EOF

Lean is ready. Put this in the config (LeanVerifier / get_verifier("local", ...)):

  repl_command = ["$lake_bin", "env", "$REPL_BIN"]
  cwd = "$PROJECT_DIR"

(memory_limit_mb: importing Mathlib needs several GB of address space; keep the default 16384, or at least
9000 for recent Mathlib. Tests marked 'lean' find this installation through FD_JAX_LEAN_DIR=$PREFIX.)
EOF
