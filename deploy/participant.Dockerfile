# Perspective participant (volunteer) image: `perspective participant run` supervises
# flower-supernode + the worker. State (keys, CA, cache) lives in the /state volume.
#   docker build -f deploy/participant.Dockerfile -t perspective-participant .
#   docker run --rm -v pstate:/state perspective-participant join https://coord --token T --name me
#   docker run -d --restart=always -v pstate:/state perspective-participant run
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared_model shared_model
COPY coordinator coordinator
COPY participant participant
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /state --create-home perspective
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
USER perspective
WORKDIR /state
VOLUME ["/state"]
HEALTHCHECK --interval=60s --timeout=10s CMD perspective participant status --state-dir /state --json >/dev/null
ENTRYPOINT ["perspective", "participant"]
CMD ["run", "--state-dir", "/state"]
