# The calm-ray image: the pinned Ray image plus this checkout and its locked dependencies. Every node
# of cluster.yaml and every pod of k8s/ runs it (docs/cluster.md, "The image").
#
#   export CALM_RAY_IMAGE=<registry>/calm-ray:0.1.0-ray2.60.0-py311-gpu-$(git rev-parse --short HEAD)
#   docker build -t "$CALM_RAY_IMAGE" . && docker push "$CALM_RAY_IMAGE"
#   scripts/set_image.sh "$CALM_RAY_IMAGE"      # names it in cluster.yaml and k8s/*.yaml
#
# The base tag matches the Ray that pyproject.toml pins (ray>=2.60,<2.61) and constraints.txt locks.
FROM rayproject/ray:2.60.0-py311-gpu

# Dependencies first, in their own layer: rebuilt only when the lock changes. constraints.txt pins every
# package that `pip install .[cluster]` installs (scripts/make_constraints.py; the runtime part of the lock
# that .venv and CI install, constraints-dev.txt); ray==2.60.0 is the
# image's own and stays. torch==2.13.0 from PyPI is the CUDA build and brings its CUDA libraries
# (nvidia-* wheels): a node needs only a recent NVIDIA driver (cluster.yaml's GPU AMI has one).
COPY --chown=1000:100 constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -r /tmp/constraints.txt

# The checkout (user ray, uid 1000 / gid 100): code, configs and the committed model pair in assets/;
# .dockerignore keeps out what git ignores. An editable install, so the code that runs is the code in
# /home/ray/calm-ray, and relative paths in configs (assets/..., configs/...) resolve there.
COPY --chown=1000:100 . /home/ray/calm-ray
WORKDIR /home/ray/calm-ray
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import ray, torch, transformers, boto3, composition, actors, jobs; \
assert ray.__version__ == '2.60.0', ray.__version__; print('ray', ray.__version__, 'torch', torch.__version__)"
