"""The one exception type of hvd_compress."""


class HvdCompressError(ValueError):
    """Raised for every misuse hvd_compress detects: a bad spec string, a parameter out of
    range, a tensor of the wrong dtype, a compressor combined with a feedback rule it does
    not satisfy, or a stateful compressor used where parameters cannot be told apart.

    The message always names the offending spec, parameter or tensor and says what was
    expected, so the error can be fixed from the message alone.
    """

    # Exception's own constructor (which ValueError's behaves as): TensorFlow's autograph
    # re-raises an error from code it traced as the same type only for such a constructor,
    # so inside tf.function this error stays an HvdCompressError instead of a StagingError
    __init__ = Exception.__init__
