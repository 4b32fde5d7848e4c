"""What one server accepts: sizes, lengths, concurrency and time, in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ServeLimits:
    """Limits a server enforces on every request, from the browser or the HTTP API."""

    max_upload_mb: float = 20.0  # per file, checked by Gradio on upload and by the image loader
    max_image_pixels: int = 40_000_000  # larger images are refused (decompression bombs)
    max_images: int = 8  # per conversation
    max_message_chars: int = 8_000  # per user message, checked before tokenizing
    max_new_tokens: int = 512  # requests asking for more are capped
    concurrency: int = 8  # conversations decoding at once (one batch); the rest wait in a queue
    queue_size: int = 64  # waiting requests beyond this are refused
    queue_timeout_s: float = 300.0  # a request waiting longer is refused as busy
    generation_timeout_s: float = 120.0  # generation stops (and says so) after this long
    # While others decode, a new request waits up to prefill_wait_s for prefill_group - 1 more
    # to share its prefill pass (1: never wait). 8 soak clients: 2.4x -> 3.0-3.2x one client.
    prefill_group: int = 4
    prefill_wait_s: float = 0.15

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"ServeLimits.{name} must be positive, got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
