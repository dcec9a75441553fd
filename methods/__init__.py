"""Built-in method plugins, one file each; every module here registers itself on import."""
