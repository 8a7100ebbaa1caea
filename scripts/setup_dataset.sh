#!/usr/bin/env bash
# Make sure Fashion-MNIST is installed: the mini model family's training data and the metrics' test split
# (Debian package dataset-fashion-mnist: gzipped IDX files in /usr/share/datasets/fashion-mnist). Only the
# training scripts and the tests that train or measure need it; the committed weights do not. Sourced by
# test.sh; exports DM_FASHION_MNIST. Run it directly to install the dataset: bash scripts/setup_dataset.sh
set -euo pipefail

DM_FASHION_MNIST="${DM_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
if [[ ! -f "$DM_FASHION_MNIST/train-images-idx3-ubyte.gz" || ! -f "$DM_FASHION_MNIST/t10k-labels-idx1-ubyte.gz" ]]; then
    echo "installing Fashion-MNIST (apt: dataset-fashion-mnist) for the mini model family"
    sudo_cmd=()
    [[ "$(id -u)" != 0 ]] && sudo_cmd=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends dataset-fashion-mnist > /dev/null
    DM_FASHION_MNIST=/usr/share/datasets/fashion-mnist
fi
export DM_FASHION_MNIST
