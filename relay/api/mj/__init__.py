"""The native Midjourney-proxy surface (`/mj/...`, `/mj-{mode}/mj/...`, `/v1/mj/...`)."""
