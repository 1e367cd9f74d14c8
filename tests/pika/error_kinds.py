#!/usr/bin/env python3
"""A pika client that sends each BODY as a request and reports the error headers of each reply.

Usage: error_kinds.py URL QUEUE BODY... Prints one JSON object: each body to
{"error": ..., "error-kind": ...} (null where a header is absent). Exits 1 after 10 s without
every reply.
"""
import json
import sys
import time

import pika

url, queue, bodies = sys.argv[1], sys.argv[2], sys.argv[3:]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
seen = {}


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def on_reply(ch, method, props, body):
    headers = props.headers or {}
    seen[props.correlation_id] = {
        "error": text(headers.get("error")),
        "error-kind": text(headers.get("error-kind")),
    }


channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)
for body in bodies:
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        properties=pika.BasicProperties(reply_to=reply_queue, correlation_id=body),
        body=body.encode(),
    )
deadline = time.monotonic() + 10
while len(seen) < len(bodies) and time.monotonic() < deadline:
    connection.process_data_events(time_limit=0.1)
connection.close()
if len(seen) < len(bodies):
    print(f"only {len(seen)} of {len(bodies)} replies within 10 s", file=sys.stderr)
    sys.exit(1)
print(json.dumps(seen), flush=True)
