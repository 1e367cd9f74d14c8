#!/usr/bin/env python3
"""A pika client that sends one request with headers and every property a caller can set.

Usage: call_with_properties.py URL QUEUE. Sends the body "hello" with headers x-echo-color
(str), x-number (int), x-flag (bool) and plain (str), and the properties content_type,
content_encoding, correlation_id, message_id, type, app_id, user_id and timestamp. Prints one
JSON object: the reply's "body" (text), "headers" (each value as str) and "content_type".
Exits 1 after 10 s without a reply.
"""
import json
import sys
import time
import uuid

import pika

url, queue = sys.argv[1], sys.argv[2]
user = pika.URLParameters(url).credentials.username
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
        reply["content_type"] = props.content_type


channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)
channel.basic_publish(
    exchange="",
    routing_key=queue,
    properties=pika.BasicProperties(
        reply_to=reply_queue,
        correlation_id=correlation_id,
        headers={"x-echo-color": "blue", "x-number": 42, "x-flag": True, "plain": "text"},
        content_type="text/plain",
        content_encoding="utf-8",
        message_id="message-1",
        type="greeting",
        app_id="pika-peer",
        user_id=user,
        timestamp=int(time.time()),
    ),
    body=b"hello",
)
deadline = time.monotonic() + 10
while not reply and time.monotonic() < deadline:
    connection.process_data_events(time_limit=0.1)
connection.close()
if not reply:
    print("no reply within 10 s", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"correlation_id": correlation_id, **reply}), flush=True)
