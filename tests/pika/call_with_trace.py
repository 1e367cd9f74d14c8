#!/usr/bin/env python3
"""A pika client that sends one request with W3C trace context headers.

Usage: call_with_trace.py URL QUEUE TRACEPARENT TRACESTATE. Sends "10" with headers
traceparent and tracestate. Prints one JSON object: the reply's "body" and its "headers" (each
value as str), among others. Exits 1 after 10 s without a reply.
"""
import json
import sys

from peer import call

url, queue, traceparent, tracestate = sys.argv[1:5]
reply = call(url, queue, b"10", headers={"traceparent": traceparent, "tracestate": tracestate})
print(json.dumps(reply), flush=True)
