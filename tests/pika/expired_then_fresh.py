#!/usr/bin/env python3
"""A pika peer that sends a request whose deadline has passed, then a fresh one.

Usage: expired_then_fresh.py URL QUEUE BIG_N. Publishes BIG_N with a `deadline` header one
second in the past (Unix milliseconds), then "10" without one, and waits up to 10 s for the
reply to "10". Prints one JSON object: "fresh" (the reply body to "10", or null) and
"expired_answered" (whether any reply to the expired request came).
"""
import json
import sys
import time

import pika

url, queue, big_n = sys.argv[1], sys.argv[2], sys.argv[3]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
replies = {}


def on_reply(ch, method, props, body):
    replies[props.correlation_id] = body.decode()


channel.basic_consume(queue=reply_queue, on_message_callback=on_reply, auto_ack=True)
past = int(time.time() * 1000) - 1000
channel.basic_publish(
    exchange="",
    routing_key=queue,
    properties=pika.BasicProperties(
        reply_to=reply_queue, correlation_id="expired", headers={"deadline": past}
    ),
    body=big_n.encode(),
)
channel.basic_publish(
    exchange="",
    routing_key=queue,
    properties=pika.BasicProperties(reply_to=reply_queue, correlation_id="fresh"),
    body=b"10",
)
deadline = time.monotonic() + 10
while "fresh" not in replies and time.monotonic() < deadline:
    connection.process_data_events(time_limit=0.1)
# A reply to the expired request, had it been computed, would have come before "fresh".
connection.process_data_events(time_limit=0.2)
connection.close()
print(json.dumps({"fresh": replies.get("fresh"), "expired_answered": "expired" in replies}))
