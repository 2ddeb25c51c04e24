"""Run settings: the defaults of every field (`defaults`) and the start-up checks (`validation`)."""
