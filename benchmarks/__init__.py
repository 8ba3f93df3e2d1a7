"""fastclr's benchmark suite: fastclr against what users run today, side by side."""
