"""One sampling run: the request, the schedule, the samplers, the guider with its model passes, the step cache and
noise masks, ControlNet hints, the per-variant defaults and the pipeline over them."""
