# Image for the Node examples used by compose.yaml: examples/legacy-node (the
# legacy IVR app) and examples/bank-service (the service that decrypts). The
# build context is the example's directory; only its package files and
# server.js are copied (never a local node_modules).
#
#   docker build -f docker/node-example.Dockerfile -t legacy-node examples/legacy-node
FROM node:22-bookworm-slim
WORKDIR /app
ENV NODE_ENV=production
COPY package*.json ./
RUN if [ -f package-lock.json ]; then npm ci --omit=dev --no-audit --no-fund; fi
COPY server.js ./
# Numeric, so Kubernetes' runAsNonRoot can verify it (the image's "node" user).
USER 1000:1000
EXPOSE 3000
CMD ["node", "server.js"]
