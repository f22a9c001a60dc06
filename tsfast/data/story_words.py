"""Word banks for the synthetic story generator (tsfast.data.synthetic).

Plain data: who the stories are about, where they happen, what they play with and how
they feel. Kept apart from the grammar so the generator reads as a story plan.
"""

from __future__ import annotations

GIRL_NAMES = (
    "Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Amy", "Ella", "Rose", "Ruby",
    "Daisy", "Kate", "Nina", "Jenny", "Sara", "Molly", "Grace", "Ivy", "Hannah", "Maya",
    "Lola", "Chloe", "Tina", "Bella", "Julia", "Nora", "Kim",
)
BOY_NAMES = (
    "Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Jake", "Finn", "Oscar", "Noah",
    "Toby", "Ollie", "Luke", "Eli", "Joe", "Billy", "Danny", "Alex", "Owen", "Jim", "Bob",
    "Ned", "Milo", "Henry", "Theo", "Ryan", "Adam",
)
PET_NAMES = (
    "Spot", "Fluffy", "Coco", "Pip", "Bubbles", "Whiskers", "Buddy", "Patch", "Sunny",
    "Pepper", "Snowy", "Twig", "Button", "Nutmeg", "Ziggy", "Honey", "Rusty", "Dot",
)
# (kind, is a person): animals and creatures are called by their kind ("the puppy").
PERSON_KINDS = ("girl", "boy")
ANIMAL_KINDS = (
    "puppy", "kitten", "bunny", "bear", "duck", "mouse", "squirrel", "fox", "frog",
    "bird", "turtle", "lamb", "pig", "owl", "dragon", "robot", "dinosaur", "monkey",
)
TRAITS = (
    "little", "kind", "curious", "shy", "brave", "silly", "happy", "clever", "friendly",
    "playful", "gentle", "cheerful", "small", "busy", "funny", "sleepy", "proud", "careful",
)
GROWN_UPS = (
    ("Mom", "she"), ("Dad", "he"), ("Grandma", "she"), ("Grandpa", "he"),
    ("the teacher", "she"), ("Aunt May", "she"), ("Uncle Bill", "he"),
    ("the wise old owl", "he"), ("the kind farmer", "he"), ("Mama Bear", "she"),
)

# outdoor places (the wind, trees and rain of the plots must fit): name, a few things one
# sees there, a place to look for lost things, what makes it fun
PLACES = (
    ("the park", ("swings", "a big slide", "a pond with ducks"), "under the slide", "run on the grass"),
    ("the forest", ("tall trees", "red mushrooms", "a little stream"), "behind a big log", "listen to the birds"),
    ("the beach", ("soft sand", "blue waves", "pretty shells"), "under a pile of sand", "splash in the water"),
    ("the garden", ("bright flowers", "busy bees", "a little gate"), "between the flowers", "smell the roses"),
    ("the farm", ("a red barn", "cows and sheep", "a haystack"), "inside the haystack", "feed the chickens"),
    ("the big hill", ("green grass", "a tall tree at the top", "a winding path"), "behind a bush", "roll down the grass"),
    ("the river", ("a wooden bridge", "smooth stones", "little fish"), "between the stones", "watch the fish swim"),
    ("the meadow", ("yellow flowers", "butterflies", "tall grass"), "in the tall grass", "chase butterflies"),
    ("the backyard", ("a sandbox", "a small tree", "a wooden fence"), "in the sandbox", "dig in the dirt"),
    ("the zoo", ("lions", "a tall giraffe", "noisy monkeys"), "near the monkey house", "wave at the animals"),
    ("the school yard", ("a jungle gym", "hopscotch squares", "a big bell"), "by the fence", "play tag"),
    ("the snowy field", ("white snow", "icicles", "a frozen pond"), "under the snow", "make snow angels"),
    ("the town square", ("a fountain", "a bakery", "a clock tower"), "by the fountain", "hear the clock ring"),
    ("the lake", ("a little boat", "green frogs", "tall reeds"), "in the reeds", "skip stones"),
)

# noun, adjectives that fit, what one does with it, a way it can break
OBJECTS = (
    ("ball", ("red", "bouncy", "big", "blue"), "play catch with", "it got a hole"),
    ("kite", ("red", "long", "colorful", "paper"), "fly", "its string snapped"),
    ("toy car", ("shiny", "fast", "little", "green"), "race", "a wheel fell off"),
    ("teddy bear", ("soft", "brown", "old", "fluffy"), "hug", "its arm came loose"),
    ("balloon", ("red", "yellow", "big", "round"), "hold", "it went pop"),
    ("toy boat", ("wooden", "little", "blue", "shiny"), "sail", "its sail tore"),
    ("drum", ("loud", "little", "red", "shiny"), "bang on", "its top split"),
    ("picture book", ("big", "new", "colorful", "funny"), "read", "a page tore"),
    ("rock", ("shiny", "smooth", "sparkly", "round"), "collect", "it cracked in two"),
    ("doll", ("pretty", "old", "small", "soft"), "dress up", "its dress ripped"),
    ("blanket", ("warm", "soft", "striped", "blue"), "cuddle with", "it got a big hole"),
    ("box of crayons", ("bright", "new", "big", "little"), "draw with", "its lid tore off"),
    ("bucket", ("yellow", "plastic", "little", "red"), "fill", "its handle broke"),
    ("hat", ("funny", "big", "green", "warm"), "wear", "it got squashed"),
    ("bike", ("red", "new", "fast", "shiny"), "ride", "its chain came off"),
    ("jump rope", ("long", "pink", "new", "bouncy"), "jump with", "it got tangled"),
    ("puzzle", ("big", "hard", "colorful", "new"), "put together", "a piece went missing"),
    ("whistle", ("silver", "loud", "little", "shiny"), "blow", "it got bent"),
    ("shell", ("pink", "pretty", "shiny", "big"), "listen to", "it chipped"),
    ("train", ("wooden", "long", "red", "toy"), "push", "a car fell off"),
)

LIGHT_OBJECTS = ("ball", "kite", "balloon", "hat", "teddy bear", "jump rope")  # can blow into a tree

FEELINGS = {
    "happy": ("happy", "glad", "joyful", "cheerful"),
    "sad": ("sad", "upset", "gloomy", "unhappy"),
    "scared": ("scared", "afraid", "frightened", "nervous"),
    "angry": ("angry", "mad", "cross", "grumpy"),
    "excited": ("excited", "thrilled", "eager", "bouncy"),
    "worried": ("worried", "uneasy", "anxious", "troubled"),
    "proud": ("proud", "pleased", "tall and proud", "very proud"),
    "lonely": ("lonely", "alone", "left out", "sad and alone"),
    "surprised": ("surprised", "amazed", "astonished", "puzzled"),
    "sorry": ("sorry", "bad", "ashamed", "guilty"),
}

WEATHER = ("sunny", "windy", "bright", "warm", "cool", "cloudy", "quiet", "lovely", "cold")
TIMES = ("day", "morning", "afternoon", "evening")
SCARY_THINGS = (
    ("the dark", "the light from a little lamp", "nothing but a pile of clothes"),
    ("a big dog", "the dog's wagging tail", "a friendly dog who wanted to play"),
    ("the thunder", "a warm hug", "just noisy clouds"),
    ("a strange noise", "a flashlight", "a little cat in a box"),
    ("the deep water", "a pair of arm floats", "not so deep after all"),
    ("a long shadow", "a lantern", "only the shadow of a tree"),
)
HURT_ANIMALS = (
    ("a baby bird", "had fallen from its nest", "put it back in its nest", "mother bird"),
    ("a little duckling", "was lost and crying", "took it back to the pond", "mother duck"),
    ("a tiny kitten", "was stuck in a bush", "gently pulled it out", "mother cat"),
    ("a small turtle", "was stuck on its back", "turned it over", "big turtle"),
    ("a little lamb", "had wandered away", "led it back to the field", "mother sheep"),
    ("a baby squirrel", "could not climb down a tree", "held out a long branch", "mother squirrel"),
)
HARD_TASKS = (
    ("climb to the top of the big tree", "slipped down", "held on tight and climbed slowly"),
    ("build the tallest tower of blocks", "watched it fall over", "put the big blocks at the bottom"),
    ("ride a bike without help", "wobbled and fell", "kept pedaling and looked ahead"),
    ("jump over the puddle", "landed with a splash", "took a long run first"),
    ("tie shoes all alone", "made a big knot", "made two bunny ears and crossed them"),
    ("swim to the other side", "got tired halfway", "kicked slowly and breathed"),
    ("catch the ball", "missed it again and again", "watched the ball all the way"),
    ("whistle a song", "only made a windy sound", "practiced every day"),
)
TREATS = ("cookies", "cake", "candy", "ice cream", "berries", "pie", "jam", "apples")
GIFTS = ("a drawing", "a card", "a little song", "a paper crown", "a necklace of beads", "a clay cup")
