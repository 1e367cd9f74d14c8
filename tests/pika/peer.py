"""What the single-request pika peers share: send one request, wait for its reply.

`call(url, queue, body, **properties)` publishes `body` to `queue` with a fresh exclusive reply
queue and correlation id, plus `properties` (pika.BasicProperties fields), and returns the
reply as a dict: "correlation_id", "body" (text), "headers" (each value as str) and
"content_type". Exits 1 after 10 s without a reply.
"""
import sys
import time
import uuid

import pika


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def call(url, queue, body, **properties):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
    correlation_id = str(uuid.uuid4())
    reply = {}

    def on_reply(ch, method, props, reply_body):
        if props.correlation_id == correlation_id:
            reply["correlation_id"] = correlation_id
            reply["body"] = reply_body.decode()
            reply["headers"] = {name: text(value) for name, value in (props.headers or {}).items()}
            reply["content_type"] = props.content_type

    channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)
    channel.basic_publish(
        exchange="",
        routing_key=queue,
        properties=pika.BasicProperties(
            reply_to=reply_queue, correlation_id=correlation_id, **properties
        ),
        body=body,
    )
    deadline = time.monotonic() + 10
    while not reply and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.1)
    connection.close()
    if not reply:
        print("no reply within 10 s", file=sys.stderr)
        sys.exit(1)
    return reply
