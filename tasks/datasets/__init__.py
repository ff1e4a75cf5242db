"""Dataset-level tools shared by both tasks: the start-up check and its report, the built-in shapes sets."""
