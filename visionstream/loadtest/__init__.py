"""Load testing: the paced load generator, its report maths and its charts."""
