"""The pages of the main window (one QWidget each)."""
