"""Run folders: the layout (file names, one source of truth) and the atomic store."""
