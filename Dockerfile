# slotroute in one slim image: slotd, the dispatcher and the stand-in backends.
#
#   docker build -t slotroute:local .
#   docker run --rm --init \
#     -p 127.0.0.1:50051-50052:50051-50052 -p 127.0.0.1:41000-41099:41000-41099 \
#     slotroute:local
#
# The default command runs the example box (examples/box.toml) with both
# services in one process. compose.yaml runs them as two containers instead.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package metadata names README.md, so the build needs it.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin slotroute

COPY examples ./examples

USER slotroute

# 50051 slotd, 50052 dispatcher, 41000-41099 the backends of examples/box.toml.
EXPOSE 50051 50052 41000-41099

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["slotroute", "health", "--quiet", "--address", "127.0.0.1:50052"]

ENTRYPOINT ["slotroute"]
# Inside a container the services listen on 0.0.0.0, or published ports could
# not reach them. --allow-insecure-bind permits that plaintext bind: publish
# the ports on the host's loopback only, as the `docker run` line above does.
# Backends bind 0.0.0.0 too, and their endpoint URLs name 127.0.0.1.
CMD ["up", "--config", "/app/examples/box.toml", \
     "--slotd-listen", "0.0.0.0:50051", "--dispatcher-listen", "0.0.0.0:50052", \
     "--backend-host", "0.0.0.0", "--advertise-host", "127.0.0.1", \
     "--allow-insecure-bind"]
