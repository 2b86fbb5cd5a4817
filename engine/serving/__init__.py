"""Serving many requests on one resident model: the scheduler decides who runs each step, the runner how;
the registry loads and hot-swaps versions; `local` is the in-process engine, `service` its HTTP face and
`client` the bot's way to call it; `metrics` and `bench` measure it."""
