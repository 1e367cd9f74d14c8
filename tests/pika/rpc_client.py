#!/usr/bin/env python3
"""The RabbitMQ tutorial's Fibonacci RPC client on pika 1.x, as a peer for interop tests.

Usage: rpc_client.py URL QUEUE N. Prints " [.] Got RESULT"; exits 1 after 10 s without reply.
"""
import sys
import time
import uuid

import pika

url, queue, n = sys.argv[1], sys.argv[2], int(sys.argv[3])


class FibonacciRpcClient:
    def __init__(self):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, n):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key=queue,
            properties=pika.BasicProperties(
                reply_to=self.callback_queue, correlation_id=self.corr_id
            ),
            body=str(n),
        )
        deadline = time.monotonic() + 10
        while self.response is None and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)
        return self.response


client = FibonacciRpcClient()
print(f" [x] Requesting fib({n})", flush=True)
response = client.call(n)
if response is None:
    print("no reply within 10 s", file=sys.stderr)
    sys.exit(1)
print(f" [.] Got {int(response)}", flush=True)
