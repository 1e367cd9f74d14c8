#!/usr/bin/env python3
"""A pika server that answers each request with a JSON description of what it received.

Usage: properties_server.py URL QUEUE. Prints " [x] Awaiting RPC requests" once it consumes.
The reply body is {"body", "headers" (each value as str), "content_type", "type"}; the reply
has content type application/json and the header x-served-by = "pika".
"""
import json
import sys

import pika

url, queue = sys.argv[1], sys.argv[2]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue)


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def on_request(ch, method, props, body):
    seen = {
        "body": body.decode(errors="replace"),
        "headers": {name: text(value) for name, value in (props.headers or {}).items()},
        "content_type": props.content_type,
        "type": props.type,
    }
    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(
            correlation_id=props.correlation_id,
            content_type="application/json",
            headers={"x-served-by": "pika"},
        ),
        body=json.dumps(seen),
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=queue, on_message_callback=on_request)
print(" [x] Awaiting RPC requests", flush=True)
channel.start_consuming()
