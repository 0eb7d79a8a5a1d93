"""What the controller and the node agents share: the controller<->agent protocol modules."""
