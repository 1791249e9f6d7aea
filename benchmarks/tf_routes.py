"""TensorFlow step time through each route, as a ratio to Horovod's uncompressed tape,
measured in one run under mpirun:

    mpirun -np 2 python benchmarks/tf_routes.py [--steps 60] [--hidden 512] [--only auto]

One compiled training step (forward, backward, exchange, SGD update) of an MLP on a9a
batches; each route times the same steps after two warm-up steps, the routes taking turns
step by step (a slow stretch of a shared machine falls on every route alike), and rank 0
prints the median step time over the uncompressed Horovod tape's, with the bits each rank
sent per step. On one machine over loopback the wire is nearly free, so the ratio is what the
compression and its route cost in compute; on a slow network the bits column is what buys
it back.
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", nargs="+", metavar="WORDS",
                    help="time only the routes whose label holds one of these (the "
                         "uncompressed tape, the baseline, always runs)")
    args = ap.parse_args()

    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd

    import hvd_compress.tensorflow as hctf
    from hvd_compress.datasets import load_libsvm

    hvd.init()
    tf.get_logger().setLevel("ERROR")  # not the note that each route traces its own step
    X, y = load_libsvm("a9a")
    rs = np.random.RandomState(hvd.rank())
    batches = [rs.choice(len(y), args.batch) for _ in range(args.steps + 2)]
    routes = [
        ("Horovod tape, no compression", "hvd", None),
        ("Horovod tape, Horovod's fp16", "hvd", hvd.Compression.fp16),
        ("hvd_compress tape, fp16", "ours", "fp16"),
        ("hvd_compress tape, topk:0.01+ef21sgdm", "ours", "topk:0.01+ef21sgdm"),
        ("Horovod tape, compression=topk:0.01+ef21sgdm", "hvd", "topk:0.01+ef21sgdm"),
        ("hvd_compress tape, topk:0.01,indices=varint+ef14", "ours",
         "topk:0.01,indices=varint+ef14"),
        ("hvd_compress tape, qsgd", "ours", "qsgd"),
        ("hvd_compress tape, topk+ef14+dynamic:c0=20000", "ours",
         "topk+ef14+dynamic:c0=20000"),
        ("hvd_compress tape, topk+ef14+dynamic:c0=20000,agree=true", "ours",
         "topk+ef14+dynamic:c0=20000,agree=true"),
        ("hvd_compress tape, qsgd+dynamic", "ours", "qsgd+dynamic"),
        ("hvd_compress tape, bernoulli+dynamic:c0=20000", "ours",
         "bernoulli+dynamic:c0=20000"),
        ("hvd_compress tape, auto (it measures on step 1)", "ours", "auto"),
    ]
    if args.only:
        routes = routes[:1] + [r for r in routes[1:] if any(w in r[0] for w in args.only)]
    h = args.hidden
    if hvd.rank() == 0:
        print(f"{hvd.size()} ranks, MLP 123-{h}-{h}-1 ({124 * h + (h + 1) * h + h + 1:,} "
              f"parameters), batch {args.batch}, median of {args.steps} steps, the routes "
              "taking turns step by step")
        print(f"{'route':<60}{'time/step':>10}{'bits/step/rank':>16}")
    made = []
    for label, where, comp in routes:
        comp = hctf.compression(comp) if isinstance(comp, str) else comp
        made.append((label, comp, trainer(where, comp, args)))
    times: dict = {label: [] for label, _, _ in made}
    for i, b in enumerate(batches):  # every route runs step i before any runs step i + 1
        x, t = tf.constant(X[b]), tf.constant(y[b])
        for label, _, step in made:
            t0 = time.perf_counter()
            step(x, t)
            hvd.allreduce(tf.zeros(1), name="bench.sync")  # steps end together
            if i >= 2:
                times[label].append(time.perf_counter() - t0)
    base = float(np.median(times[made[0][0]]))
    for label, comp, _ in made:
        bits = "dense 32-bit" if comp is None else (
            "dense 16-bit" if not hasattr(comp, "telemetry") else
            f"{comp.telemetry.total_bits() / (args.steps + 2):,.0f}")
        if hvd.rank() == 0:
            print(f"{label:<60}{float(np.median(times[label])) / base:>9.2f}x{bits:>16}",
                  flush=True)


def trainer(where, comp, args):
    """One compiled training step of a fresh MLP (the same initial weights for every
    route) through ``where``'s tape ("hvd": Horovod's, "ours": hvd_compress's)."""
    import tensorflow as tf
    import horovod.tensorflow as hvd

    import hvd_compress.tensorflow as hctf
    tf.keras.utils.set_random_seed(0)
    sizes = [(123, args.hidden), (args.hidden,), (args.hidden, args.hidden),
             (args.hidden,), (args.hidden, 1), (1,)]
    params = [tf.Variable(tf.random.normal(s, stddev=0.05), name=f"p{i}")
              for i, s in enumerate(sizes)]

    @tf.function
    def step(x, t):
        with tf.GradientTape() as tape:
            h = tf.nn.relu(x @ params[0] + params[1])
            h = tf.nn.relu(h @ params[2] + params[3])
            logits = tf.squeeze(h @ params[4] + params[5], 1)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(t, logits))
        if where == "hvd":
            kwargs = {} if comp is None else {"compression": comp}
            tape = hvd.DistributedGradientTape(tape, **kwargs)
        else:
            tape = hctf.DistributedGradientTape(tape, compression=comp)
        for p, g in zip(params, tape.gradient(loss, params)):
            p.assign_sub(0.1 * g)
    return step


if __name__ == "__main__":
    main()
