r"""Train an embedded ELSA model from the command line.

With no flags it runs offline: the small CNN on scikit-learn's bundled 8x8
digits, five levels from 0.95 sparsity to dense, then the TFLite export of every
level and the report (`report.md`, `report.json`, `report.png`) in --workdir.

    python examples/train.py
    python examples/train.py --dataset=mnist1d --sparsities=0.9,0.5,0.0 \
        --baseline=independent,independent_elsa --workdir=/tmp/elsa_mnist1d
    python examples/train.py --dataset=cifar10 --data_dir=~/tensorflow_datasets
    python examples/train.py --workdir=/tmp/elsa_train --resume
    python examples/train.py --overwrite    # replace the previous run's outputs

Installed with the package as the `elsa-train` command. `--help` lists its
flags; the library side is `elsa_tf.experiments.run.train_and_evaluate`.
"""

from elsa_tf.experiments.main import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
