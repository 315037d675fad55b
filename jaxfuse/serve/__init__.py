"""The image server, `python -m jaxfuse.serve` (the `[serve]` extra: aiohttp):

    jobs      the OpenAI and A1111 request bodies read into checked jobs; the server's limits
    queue     the bounded queue that batches jobs sharing a compiled program
    worker    the device thread: a batch as one request, padded to a compiled size; warming
    hosts     batches handed from process 0 to every process of a multi-host server
    metrics   counters and Prometheus' text format
    app       the HTTP endpoints, the page, draining on SIGTERM
    cli       the command line
"""
