#!/bin/sh
# One-shot (minio/mc image): creates the videos bucket, keeps it private, and gives the API and
# workers their own access key limited to that bucket, so the root credentials stay with MinIO.
# Safe to run again. Env: MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, VIDEO_BUCKET,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
set -eu

bucket=${VIDEO_BUCKET:-videos}
# mc reads the alias from MC_HOST_<alias>: the root credentials stay off the command line.
# Both secrets must be URL-safe (the .env.example suggests hex).
export MC_HOST_store="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@minio:9000"

mc mb --ignore-existing "store/$bucket"
mc anonymous set none "store/$bucket"

# Written with printf, a shell built-in: the mc image is minimal (no grep, maybe no cat).
policy=/tmp/videos-rw.json
printf '%s\n' \
    '{"Version": "2012-10-17", "Statement": [' \
    "  {\"Effect\": \"Allow\", \"Action\": [\"s3:ListBucket\", \"s3:GetBucketLocation\"]," \
    "   \"Resource\": [\"arn:aws:s3:::$bucket\"]}," \
    "  {\"Effect\": \"Allow\", \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\"," \
    "                                \"s3:AbortMultipartUpload\", \"s3:ListMultipartUploadParts\"]," \
    "   \"Resource\": [\"arn:aws:s3:::$bucket/*\"]}" \
    ']}' >"$policy"
mc admin policy create store videos-rw "$policy"
# `user add` updates the secret of an existing user, so a rotated AWS_SECRET_ACCESS_KEY applies.
mc admin user add store "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
# attach fails when the policy is attached already; what counts is that it is attached now.
mc admin policy attach store videos-rw --user "$AWS_ACCESS_KEY_ID" || true
info=$(mc admin user info store "$AWS_ACCESS_KEY_ID")
case "$info" in
    *videos-rw*) ;;
    *) echo "policy videos-rw is not attached to $AWS_ACCESS_KEY_ID: $info" >&2; exit 1 ;;
esac
echo "bucket $bucket ready for $AWS_ACCESS_KEY_ID"
