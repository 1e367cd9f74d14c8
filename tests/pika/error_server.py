#!/usr/bin/env python3
"""A pika server that answers every request with an error reply in the old style: the message
in the `error` header (and the body), and no `error-kind` header.

Usage: error_server.py URL QUEUE. Prints " [x] Awaiting RPC requests" once it consumes.
"""
import sys

import pika

url, queue = sys.argv[1], sys.argv[2]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue)


def on_request(ch, method, props, body):
    message = "cannot serve " + body.decode(errors="replace")
    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(
            correlation_id=props.correlation_id, headers={"error": message}
        ),
        body=message,
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=queue, on_message_callback=on_request)
print(" [x] Awaiting RPC requests", flush=True)
channel.start_consuming()
