"""Data-parallel Keras training with compressed gradients: TensorFlow + Horovod on a9a.

    mpirun -np 2 python examples/tf_a9a.py --keras 3 --specs none fp16 topk:0.01+ef21sgdm:eta=0.2
    mpirun -np 2 python examples/tf_a9a.py --keras tf_keras

Each spec trains the same MLP with ``model.fit`` from the same initial weights on the same
shards; the only change is the ``compression=`` argument. ``--keras 3`` uses Keras 3 with
``hvd_compress.tensorflow.DistributedOptimizer`` (Horovod's own Keras wrapper cannot take
Keras 3 optimizers); ``--keras tf_keras`` uses tf_keras with Horovod's
``horovod.tensorflow.keras.DistributedOptimizer``. Rank 0 prints, per spec, the bits each
rank handed to Horovod per step (exact, headers included), the saving against dense fp32
and the held-out accuracy.
"""
import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keras", choices=["3", "tf_keras"], default="3")
    ap.add_argument("--specs", nargs="+", default=[
        "none", "fp16", "qsgd", "topk:0.01+ef14", "topk:0.01+ef21sgdm:eta=0.2",
        "topk:0.01,indices=varint+ef14"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    ap.add_argument("--lr", type=float, default=0.2)
    args = ap.parse_args()
    if args.keras == "tf_keras":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported

    import numpy as np
    import horovod.tensorflow as hvd

    import hvd_compress.tensorflow as hctf
    from hvd_compress.datasets import load_libsvm

    if args.keras == "tf_keras":
        import tf_keras as keras
        import horovod.tensorflow.keras as hvd_keras
    else:
        import keras

    hvd.init()
    X, y = load_libsvm("a9a")
    perm = np.random.RandomState(0).permutation(len(y))
    test, train = perm[:4000], perm[4000:]
    per_rank = len(train) // hvd.size() // args.batch * args.batch  # equal steps per rank
    shard = train[hvd.rank()::hvd.size()][:per_rank]
    if hvd.rank() == 0:
        print(f"a9a: {len(train)} training rows over {hvd.size()} ranks, {len(test)} held "
              f"out; Keras {keras.__version__} ({args.keras})")
        print(f"{'compression':<40}{'bits/step/rank':>15}{'saving':>8}{'accuracy':>10}")
    for spec in args.specs:
        keras.utils.set_random_seed(0)  # the same initial weights on every rank
        model = keras.Sequential([keras.Input((X.shape[1],)),
                                  keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(1)])
        comp = hctf.compression(spec)
        sgd = keras.optimizers.SGD(args.lr)
        if args.keras == "tf_keras":
            opt = hvd_keras.DistributedOptimizer(sgd, compression=comp)
        else:
            opt = hctf.DistributedOptimizer(sgd, compression=comp)
        model.compile(opt, keras.losses.BinaryCrossentropy(from_logits=True))
        model.fit(X[shard], y[shard], batch_size=args.batch, epochs=args.epochs, verbose=0)
        acc = float(((model(X[test]).numpy()[:, 0] > 0) == (y[test] > 0.5)).mean())
        tel = comp.telemetry
        steps = len({r.step for r in tel.rows})
        if hvd.rank() == 0:
            print(f"{spec:<40}{tel.total_bits() / steps:>15,.0f}{tel.ratio():>7.1f}x"
                  f"{acc:>10.4f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
