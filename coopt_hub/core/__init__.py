"""Pure core: the plan, alignment, the shard file format, the manifest, repo layout and atomic files.\nImports nothing above it, never huggingface_hub or torch."""
