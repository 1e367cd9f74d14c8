#!/usr/bin/env python3
"""The pika client of the benchmark: the RabbitMQ tutorial's FibonacciRpcClient on pika 1.x.

    pika_client.py URL QUEUE CALLS THREADS INFLIGHT N

Runs on THREADS threads with a connection each (pika connections are not thread-safe), sends
INFLIGHT requests before waiting for their replies, and prints
`calls=K errors=E calls_per_s=X p50_us=Y p99_us=Z` as `client --bench` does. The server it
calls is the tutorial's, tests/pika/rpc_server.py.
"""
import math
import sys
import threading
import time
import uuid

import pika


class FibonacciRpcClient:
    def __init__(self, url, queue):
        self.queue = queue
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.waiting = set()

    def on_response(self, ch, method, props, body):
        self.waiting.discard(props.correlation_id)

    def call_batch(self, n, size):
        for _ in range(size):
            corr_id = str(uuid.uuid4())
            self.waiting.add(corr_id)
            self.channel.basic_publish(
                exchange="",
                routing_key=self.queue,
                properties=pika.BasicProperties(
                    reply_to=self.callback_queue, correlation_id=corr_id
                ),
                body=str(n),
            )
        while self.waiting:
            self.connection.process_data_events(time_limit=None)


def run_client(url, queue, calls, threads, inflight, n):
    latencies = []
    lock = threading.Lock()

    def work(share):
        client = FibonacciRpcClient(url, queue)
        mine = []
        while share > 0:
            batch = min(share, inflight)
            started = time.perf_counter()
            client.call_batch(n, batch)
            mine.extend([int((time.perf_counter() - started) * 1e6)] * batch)
            share -= batch
        with lock:
            latencies.extend(mine)

    shares = [calls // threads + (1 if i < calls % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=work, args=(share,)) for share in shares]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def at(fraction):
        rank = math.ceil(fraction * len(latencies))
        return latencies[min(max(rank, 1), len(latencies)) - 1]

    print(
        f"calls={calls} errors={calls - len(latencies)} calls_per_s={calls / elapsed:.0f} "
        f"p50_us={at(0.50)} p99_us={at(0.99)}"
    )


if __name__ == "__main__":
    url, queue = sys.argv[1], sys.argv[2]
    calls, threads, inflight, n = (int(a) for a in sys.argv[3:7])
    run_client(url, queue, calls, threads, inflight, n)
