# The controller alone: no ML frameworks, no agent runtime.
FROM python:3.11-slim
COPY . /src
RUN pip install --no-cache-dir -c /src/constraints.txt "/src[controller]"
EXPOSE 8700
ENTRYPOINT ["slmops", "controller", "serve"]
