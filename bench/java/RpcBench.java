// The Java client's RpcClient as a benchmark peer: THREADS threads, each with its own channel
// on one connection and its own RpcClient (direct reply-to, the client's default), make CALLS
// calls of fib(N) in all, one after another, against any server of the tutorial's wire format.
//
//   java -cp /usr/share/java/amqp-client.jar:/usr/share/java/slf4j-api.jar:/usr/share/java/slf4j-nop.jar:OUT \
//       RpcBench URL QUEUE CALLS THREADS N EXPECTED
//
// Prints, last, `calls=K errors=E calls_per_s=X p50_us=Y p99_us=Z`, as `client --bench` does.
// A reply other than EXPECTED counts as an error. 2,000 untimed calls first let the JIT compile
// the client's hot path, so that the figures are the Java client's, not its warm-up's.

import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.RpcClient;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.atomic.AtomicLong;

public class RpcBench {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        String queue = args[1];
        int calls = Integer.parseInt(args[2]);
        int threads = Integer.parseInt(args[3]);
        byte[] request = args[4].getBytes(StandardCharsets.US_ASCII);
        byte[] expected = args[5].getBytes(StandardCharsets.US_ASCII);

        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(url);
        Connection connection = factory.newConnection();
        Channel warmUpChannel = connection.createChannel();
        RpcClient warmUp = new RpcClient(warmUpChannel, "", queue, "amq.rabbitmq.reply-to", 30000);
        for (int i = 0; i < 2000; i++) {
            warmUp.primitiveCall(request);
        }
        warmUp.close();
        warmUpChannel.close();
        CyclicBarrier start = new CyclicBarrier(threads + 1);
        AtomicLong errors = new AtomicLong();
        long[][] latencies = new long[threads][];
        long[] finished = new long[threads];
        List<Thread> workers = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            int index = t;
            int share = calls / threads + (t < calls % threads ? 1 : 0);
            Thread worker = new Thread(() -> {
                try {
                    Channel channel = connection.createChannel();
                    // Direct reply-to, as the client does by default; 30 s timeout.
                    RpcClient client =
                            new RpcClient(channel, "", queue, "amq.rabbitmq.reply-to", 30000);
                    long[] mine = new long[share];
                    start.await();
                    for (int i = 0; i < share; i++) {
                        long begun = System.nanoTime();
                        try {
                            byte[] reply = client.primitiveCall(request);
                            if (!Arrays.equals(reply, expected)) {
                                errors.incrementAndGet();
                            }
                        } catch (Exception e) {
                            errors.incrementAndGet();
                        }
                        mine[i] = (System.nanoTime() - begun) / 1000;
                    }
                    latencies[index] = mine;
                    finished[index] = System.nanoTime();
                    client.close();
                    channel.close();
                } catch (Exception e) {
                    throw new RuntimeException(e);
                }
            });
            worker.start();
            workers.add(worker);
        }
        start.await();
        long begun = System.nanoTime();
        for (Thread worker : workers) {
            worker.join();
        }
        long end = Arrays.stream(finished).max().orElse(begun);
        connection.close();
        long[] all = Arrays.stream(latencies).flatMapToLong(Arrays::stream).sorted().toArray();
        double seconds = (end - begun) / 1e9;
        System.out.printf("calls=%d errors=%d calls_per_s=%.0f p50_us=%d p99_us=%d%n",
                calls, errors.get(), calls / seconds, percentile(all, 0.50), percentile(all, 0.99));
    }

    static long percentile(long[] sorted, double fraction) {
        if (sorted.length == 0) {
            return 0;
        }
        int rank = (int) Math.ceil(fraction * sorted.length);
        return sorted[Math.max(1, Math.min(rank, sorted.length)) - 1];
    }
}
