"""What the gateway and the UI share: the pool of values kept between requests (`pool.py`: body
sessions, a conversation's stand-ins), the conversation they keep (`conversation.py`) and the bridge
from a generation on a bounded worker thread to an event stream (`bridge.py`)."""
