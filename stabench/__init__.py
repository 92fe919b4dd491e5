"""stabench: how well training-stabilization techniques keep deep networks trainable."""
