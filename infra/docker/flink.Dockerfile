# syntax=docker/dockerfile:1
#
# The Flink image of docker-compose.yml's flink-jobmanager, flink-taskmanager and flink-submit: the official
# Flink image of the version apache-flink 2.3.0 bundles (pyflink/lib/flink-dist-2.3.0.jar), plus Python
# 3.11, a venv with PyFlink and the Tide package, and the Kafka SQL connector. Build context: the repository
# root (the top-level .dockerignore lets in the packages and pyproject.toml):
#   make flink-image        or        docker build -f infra/docker/flink.Dockerfile -t tide-flink:0.1.0 .
#
# Notes: docs/2026-11-21-flink.md.
FROM flink:2.3.0-scala_2.12-java17

ARG PYTHON_VERSION=3.11.13
# The newest Kafka connector release (5.0.0, built for Flink 2.2; none names 2.3 yet). Maven Central only:
#   https://repo.maven.apache.org/maven2/org/apache/flink/flink-sql-connector-kafka/5.0.0-2.2/flink-sql-connector-kafka-5.0.0-2.2.jar
ARG KAFKA_CONNECTOR=5.0.0-2.2

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Python 3.11 from source, as Flink's docs do it for PyFlink images (the base image's distribution has no
# 3.11 package). Build tools are removed again in the same layer.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends build-essential ca-certificates curl libssl-dev zlib1g-dev \
        libbz2-dev libffi-dev liblzma-dev libsqlite3-dev; \
    curl -fsSL "https://www.python.org/ftp/python/${PYTHON_VERSION}/Python-${PYTHON_VERSION}.tgz" -o /tmp/py.tgz; \
    tar -xzf /tmp/py.tgz -C /tmp; \
    cd "/tmp/Python-${PYTHON_VERSION}"; \
    ./configure --prefix=/usr/local --enable-shared > /dev/null; \
    make -j"$(nproc)" > /dev/null; \
    make altinstall > /dev/null; \
    ldconfig; \
    cd /; rm -rf /tmp/py.tgz "/tmp/Python-${PYTHON_VERSION}"; \
    apt-get purge -y --auto-remove build-essential; \
    rm -rf /var/lib/apt/lists/*

# The Kafka SQL connector, checked against the SHA-1 Maven Central publishes beside it.
RUN set -eux; \
    base="https://repo.maven.apache.org/maven2/org/apache/flink/flink-sql-connector-kafka/${KAFKA_CONNECTOR}"; \
    jar="flink-sql-connector-kafka-${KAFKA_CONNECTOR}.jar"; \
    curl -fsSL "${base}/${jar}" -o "/opt/flink/lib/${jar}"; \
    echo "$(curl -fsSL "${base}/${jar}.sha1")  /opt/flink/lib/${jar}" | sha1sum -c -; \
    chown flink:flink "/opt/flink/lib/${jar}"

# The Flink venv: the same pins as `make flink-venv`, then the Tide package without its service stack.
RUN python3.11 -m venv /opt/tide-flink
ENV PATH=/opt/tide-flink/bin:$PATH
COPY features/flink/requirements.txt /tmp/flink-requirements.txt
RUN sed '/^# tests\/flink/,$d' /tmp/flink-requirements.txt > /tmp/runtime.txt \
    && pip install -r /tmp/runtime.txt
COPY . /opt/tide
RUN pip install --no-deps /opt/tide && python -c "import features.flink.job, pyflink"

# Checkpoints: the compose volume mounts here; the image's directory gives it the flink user's ownership.
RUN install -d -o flink -g flink /flink-checkpoints

# No USER: the base image's entrypoint starts as root, appends FLINK_PROPERTIES to the configuration and
# drops to the `flink` user (gosu) for every command, `flink run` included.
