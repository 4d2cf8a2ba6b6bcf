"""The little that the method files share: attention and file I/O."""
