"""Running trained models on images: the inputs predict reads and the runtimes that run a checkpoint or a
deployed file (used by tasks.predict and mobilevision.load)."""
