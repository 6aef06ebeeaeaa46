"""The relay's behaviour: planning, routing, tracking, images. `router` and `prompt` do no I/O."""
