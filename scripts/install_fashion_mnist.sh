#!/bin/sh
# Fashion-MNIST for dlrt: the Debian package dataset-fashion-mnist puts the four idx files in
# /usr/share/datasets/fashion-mnist, where dlrt.data.FashionMNIST looks by default.
# Where it cannot be installed, say how to provide the files instead, and go on: only the
# Fashion-MNIST configs and tests need it.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/t10k-images-idx3-ubyte.gz" ] || [ -n "${DLRT_FASHION_MNIST_DIR:-}" ]; then
    exit 0
fi
hint="put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz in a directory and set DLRT_FASHION_MNIST_DIR to it"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: Fashion-MNIST not installed (no apt-get on this machine): $hint" >&2
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "note: Fashion-MNIST not installed: run \`sudo apt-get install dataset-fashion-mnist\`, or $hint" >&2
    exit 0
fi
echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
       { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; then
    echo "note: apt-get could not install dataset-fashion-mnist: $hint" >&2
fi
exit 0
