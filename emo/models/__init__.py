"""EMO's networks (arXiv 2402.17485), one component per file, built on diffusers blocks."""
