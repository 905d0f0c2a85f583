"""Assets by stage, side by side: each module declares its dependencies by asset key and imports no other asset
module."""
