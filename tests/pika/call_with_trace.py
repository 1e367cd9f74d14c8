#!/usr/bin/env python3
"""A pika client that sends one request with W3C trace context headers.

Usage: call_with_trace.py URL QUEUE TRACEPARENT TRACESTATE. Prints one JSON object: the reply's
"body" and its "headers" (each value as str). Exits 1 after 10 s without a reply.
"""
import json
import sys
import time
import uuid

import pika

url, queue, traceparent, tracestate = sys.argv[1:5]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
correlation_id = str(uuid.uuid4())
reply = {}


def on_reply(ch, method, props, body):
    if props.correlation_id == correlation_id:
        reply["body"] = body.decode()
        reply["headers"] = {
            name: value.decode() if isinstance(value, bytes) else str(value)
            for name, value in (props.headers or {}).items()
        }


channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)
channel.basic_publish(
    exchange="",
    routing_key=queue,
    properties=pika.BasicProperties(
        reply_to=reply_queue,
        correlation_id=correlation_id,
        headers={"traceparent": traceparent, "tracestate": tracestate},
    ),
    body=b"10",
)
deadline = time.monotonic() + 10
while not reply and time.monotonic() < deadline:
    connection.process_data_events(time_limit=0.1)
connection.close()
if not reply:
    print("no reply within 10 s", file=sys.stderr)
    sys.exit(1)
print(json.dumps(reply), flush=True)
