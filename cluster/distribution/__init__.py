"""Model files and images to every node, sent once by the controller and passed on from node to
node (a chain), checked file by file on arrival."""
