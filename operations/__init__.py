"""What kiln does that is not a build stage, below the flows and beside the stages: reaping what builds left
(gc), revoking, publishing a local image to another cloud, comparing two builds' images (audit), auditing an
image for what sanitize must remove (image_audit), telling people (notify), the Prefect UI's artifacts, and the
layer cache's upkeep."""
