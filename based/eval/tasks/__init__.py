"""lm-eval task configs (YAML) of the BASED recall tasks on local files; lm-eval loads them from this
folder with --include_path (the `based-lm-eval` wrapper adds it)."""
