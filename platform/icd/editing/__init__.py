"""Editing modes: prompt switch (default), Prompt-to-Prompt attention control, (Guide-and-Rescale)."""
