#!/usr/bin/env bash
# Train unetpp_jax on a Cloud TPU VM slice: every worker runs the same command, jax.distributed
# connects them (automatic on TPU VMs), data is prepared once into GCS and the workdir lives there.
#
#   BUCKET=gs://my-bucket TPU_NAME=unetpp ZONE=us-central2-b ACCELERATOR=v4-16 scripts/tpu_vm.sh all
#   scripts/tpu_vm.sh create|install|train|delete      (one stage; same variables)
#
# Before: upload the release once: gsutil cp stage1_train.zip $BUCKET/dsb2018/stage1_train.zip
# Extra arguments after the stage are passed to unetpp_jax.main (e.g. --config.batch_size=256).
set -euo pipefail
: "${BUCKET:?set BUCKET=gs://your-bucket (data, TFDS files and the workdir live there)}"
TPU_NAME=${TPU_NAME:-unetpp}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-16}
VERSION=${VERSION:-tpu-ubuntu2204-base}
STAGE=${1:-all}
shift || true

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

create() {
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
}

install() {
  # Ship this checkout (without local venvs and workdirs) to every worker, then the pinned
  # requirements plus the TPU runtime matching the pinned jax, and the GCS client that
  # tensorboardX needs to write summaries into a gs:// workdir.
  tar czf /tmp/unetpp_jax.tgz --exclude=.venv --exclude=workdirs --exclude=.git .
  gcloud compute tpus tpu-vm scp /tmp/unetpp_jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
  on_all_workers "mkdir -p ~/unetpp_jax ~/dsb2018 && tar xzf /tmp/unetpp_jax.tgz -C ~/unetpp_jax \
    && cd ~/unetpp_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
    'jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)' google-cloud-storage==3.17.2 \
    && gsutil -q cp $BUCKET/dsb2018/stage1_train.zip ~/dsb2018/"
}

train() {
  # Same command on every worker; process 0 prepares the TFDS files in GCS, the others wait.
  on_all_workers "cd ~/unetpp_jax && .venv/bin/python -m unetpp_jax.main --config=configs/dsb.py \
    --workdir=$BUCKET/workdirs/dsb --config.data.manual_dir=\$HOME/dsb2018 \
    --config.data.tfds_data_dir=$BUCKET/tensorflow_datasets $*"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
}

case "$STAGE" in
  all) create; install; train "$@" ;;
  create|install|train|delete) "$STAGE" "$@" ;;
  *) echo "unknown stage '$STAGE': use all, create, install, train or delete" >&2; exit 2 ;;
esac
