#!/usr/bin/env python3
"""The RabbitMQ tutorial's Fibonacci RPC server on pika 1.x, as a peer for interop tests.

Usage: rpc_server.py URL QUEUE. Prints " [x] Awaiting RPC requests" once it consumes.
Like the tutorial it computes fib by recursion, so keep n small.
"""
import sys

import pika

url, queue = sys.argv[1], sys.argv[2]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
channel.queue_declare(queue=queue)


def fib(n):
    if n == 0:
        return 0
    if n == 1:
        return 1
    return fib(n - 1) + fib(n - 2)


def on_request(ch, method, props, body):
    n = int(body)
    response = fib(n)
    ch.basic_publish(
        exchange="",
        routing_key=props.reply_to,
        properties=pika.BasicProperties(correlation_id=props.correlation_id),
        body=str(response),
    )
    ch.basic_ack(delivery_tag=method.delivery_tag)


channel.basic_qos(prefetch_count=1)
channel.basic_consume(queue=queue, on_message_callback=on_request)
print(" [x] Awaiting RPC requests", flush=True)
channel.start_consuming()
