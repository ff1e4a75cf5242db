"""Side-by-side speed comparisons with torchvision (python -m benchmarks.run); see README.md."""
